# Sourced by bench/gpu_check.sh. pytest (8+) merges a directory argument with the files inside
# it that are also named and collects the lot in sorted order, so "tests/gpu/test_x.py
# tests/gpu" ran test_async_scheduling_gpu.py first, not test_x.py (stop 19's H200 run: the
# priority list of a time-limited call was ignored). ordered_test_paths prints its arguments
# with each directory replaced by its test files not named before it, in the order given,
# each file once. A node id (file::test) passes through and counts its file as named: a later
# directory adding the file would make pytest merge the two and run the file at its sorted
# place. Options pass through as they are, repeated or not, and so does the value after an
# option that takes one as the next argument (--deselect ID, -o k=v, --ignore PATH, ...):
# neither deduplicated nor expanded.
ordered_test_paths() {
  local seen=" " out=() p f value=0
  for p in "$@"; do
    if [ "$value" = 1 ]; then   # the previous argument's value
      out+=("$p"); value=0
      continue
    fi
    case "$p" in
      -k|-m|-o|-p|-c|-W|-r|--deselect|--ignore|--ignore-glob|--basetemp|--rootdir|\
      --confcutdir|--maxfail|--durations|--durations-min|--override-ini|--junitxml|\
      --junit-xml|--tb|--log-level|--log-file|--log-cli-level|--import-mode|--capture|\
      --timeout|--color)
        out+=("$p"); value=1
        continue ;;
      -*) out+=("$p"); continue ;;
    esac
    if [ -d "$p" ]; then
      for f in "${p%/}"/test_*.py; do
        [ -e "$f" ] || continue
        case "$seen" in *" $f "*) ;; *) out+=("$f"); seen+="$f " ;; esac
      done
    else
      case "$seen" in *" $p "*) ;; *) out+=("$p"); seen+="$p " ;; esac
      case "$p" in *::*) seen+="${p%%::*} " ;; esac   # its file: not again from a directory
    fi
  done
  echo "${out[@]}"
}
