# Helpers shared by the launchers (sourced, not run): die, quote.
# shellcheck shell=bash

die() {
  echo "error: $*" >&2
  exit 2
}

# Quotes each argument for a POSIX shell (only where needed) and joins them with spaces.
quote() {
  local arg escaped words=()
  local q="'\\''"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$arg")
    else
      escaped="${arg//\'/$q}"
      words+=("'${escaped}'")
    fi
  done
  echo "${words[*]}"
}

