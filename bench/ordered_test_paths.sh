# Sourced by bench/gpu_check.sh. pytest (8+) merges a directory argument with the files inside
# it that are also named and collects the lot in sorted order, so "tests/gpu/test_x.py
# tests/gpu" ran test_async_scheduling_gpu.py first, not test_x.py (stop 19's H200 run: the
# priority list of a time-limited call was ignored). ordered_test_paths prints its arguments
# with each directory replaced by its test files not named before it, in the order given,
# each path once; other arguments (files, node ids, options) pass through as they are.
ordered_test_paths() {
  local seen=" " out=() p f
  for p in "$@"; do
    if [ -d "$p" ]; then
      for f in "${p%/}"/test_*.py; do
        [ -e "$f" ] || continue
        case "$seen" in *" $f "*) ;; *) out+=("$f"); seen+="$f " ;; esac
      done
    else
      case "$seen" in *" $p "*) ;; *) out+=("$p"); seen+="$p " ;; esac
    fi
  done
  echo "${out[@]}"
}
