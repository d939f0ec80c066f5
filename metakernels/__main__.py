"""``python -m metakernels {train,bench}``: see metakernels/cli."""
import sys

from .cli import main

sys.exit(main())
