# Sourced by the device scripts: run from the repository root, write into $OUT (the device tool's
# folder, else ./devout), import irnn from src/ without installing it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-devout}"
mkdir -p "$OUT"
export OUT
export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
