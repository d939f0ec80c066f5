# Sourced by build_for_gpu_machine.sh and gpu_check.sh: source_stamp prints a hash of what the extension
# is built from (setup.py, csrc/, python/), so that a prebuilt metakernels/_C*.so is used only with the
# sources it was built from (a stale one would time the old kernels without a word).
source_stamp() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && find setup.py csrc python -type f ! -name '*.pyc' -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}
