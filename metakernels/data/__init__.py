"""Few-shot task data with the leading task dimension the meta-algorithms take.

- :mod:`.text`: character tokens, text domains (the built-in standard-library docstrings, or a folder
  of text files, one domain each) and their disjoint meta-train / meta-validation / meta-test split.
- :mod:`.lm_tasks`: few-shot language-modelling tasks (support and query chunks of one domain).
- :mod:`.episodes`: N-way K-shot classification episodes from labelled text (CLINC150 or one's own).

Every sampler is a pure function of (seed, batch index): batch ``i`` is the same in every run, which
is what makes ``--resume`` bit-for-bit and lets processes draw disjoint batches.
"""
from .episodes import EpisodeBatch, EpisodeSampler, load_clinc150, load_labelled_folder
from .lm_tasks import LMTaskBatch, LMTaskSampler
from .text import (DataError, PAD, VOCAB_SIZE, decode, encode, folder_domains, split_domains,
                   stdlib_domains)

__all__ = ["DataError", "PAD", "VOCAB_SIZE", "encode", "decode", "stdlib_domains", "folder_domains",
           "split_domains", "LMTaskSampler", "LMTaskBatch", "EpisodeSampler", "EpisodeBatch", "load_clinc150",
           "load_labelled_folder"]
