#!/usr/bin/env bash
# DALI for the lent GPU host, in parts that fit a device call. The host (Python 3.12, CUDA 13, no network)
# has no DALI, and DALI's wheel (~190 MiB) with the dependencies the host lacks (~65 MB: nvImageCodec, nvJPEG,
# nvCOMP, libcst...) is over the 64 MiB a call carries; ignored files stay on the host between calls while it
# is warm, so the parts travel one per call and bench/gpu_session.sh joins and installs them.
#   bash scripts/dali_wheel.sh            # download (pinned as in pyproject.toml), bundle, split into .whl/dali/
#   bash scripts/dali_wheel.sh split F    # split an existing file F instead (tests use a small fake one)
#   bash scripts/dali_wheel.sh join OUT   # on the host: check each part's sha256, join, check, print OUT/<file>
# Writes .whl/dali/<bundle>.partNN (each <= PART_MIB MiB) and .whl/dali/SHA256SUMS: the sha256 of every part
# and of the whole file (the line without .part). The bundle is a plain tar of wheels (they are zips already).
# The device calls (BENCHMARKS.md, GPU section): one per part, each carrying only its part, back to back.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=${DEST:-.whl/dali}
PART_MIB=${PART_MIB:-56}   # < 60: the working tree (~3 MB) travels in the same call, 64 MiB in all
VERSION=${DALI_VERSION:-$(sed -n 's/.*"nvidia-dali-cuda130==\([^"]*\)".*/\1/p' pyproject.toml)}
# DALI's requirements that the GPU host's image lacks (device KINDS list), at the versions this venv runs with
# DALI; six, packaging and numpy are there. nvidia-nvjpeg is the mixed decoder's nvJPEG.
DEPS=(astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
  nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
  nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82)

split_wheel() {  # split_wheel FILE: FILE -> $DEST/NAME.partNN + $DEST/SHA256SUMS
  local file=$1 name
  name=$(basename "$file")
  mkdir -p "$DEST"
  rm -f "$DEST/$name".part* "$DEST/SHA256SUMS"
  split -b "${PART_MIB}M" -d -a 2 "$file" "$DEST/$name.part"
  (cd "$(dirname "$file")" && sha256sum "$name") >"$DEST/SHA256SUMS.tmp"
  (cd "$DEST" && sha256sum "$name".part*) >>"$DEST/SHA256SUMS.tmp"
  mv "$DEST/SHA256SUMS.tmp" "$DEST/SHA256SUMS"
  echo "$name: $(stat -c %s "$file") bytes in $(ls "$DEST/$name".part* | wc -l) parts of <= $PART_MIB MiB under $DEST/"
}

join_wheel() {  # join_wheel OUTDIR: check every part listed in $DEST/SHA256SUMS, join, check the whole wheel
  local out=$1 sums=$DEST/SHA256SUMS name part want got
  [ -f "$sums" ] || { echo "error: $sums missing: carry .whl/dali/SHA256SUMS (scripts/dali_wheel.sh writes it)" >&2; return 3; }
  name=$(awk '$2 !~ /\.part[0-9]+$/ {print $2}' "$sums")
  mkdir -p "$out"
  : >"$out/$name.tmp"
  while read -r want part; do
    [[ $part =~ \.part[0-9]+$ ]] || continue
    if [ ! -f "$DEST/$part" ]; then
      echo "error: DALI wheel part $DEST/$part missing: run the device call that carries it (BENCHMARKS.md, GPU)" >&2
      rm -f "$out/$name.tmp"; return 4
    fi
    got=$(sha256sum "$DEST/$part" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      echo "error: DALI wheel part $DEST/$part is bad (sha256 $got, manifest $want): carry it again" >&2
      rm -f "$out/$name.tmp"; return 5
    fi
    cat "$DEST/$part" >>"$out/$name.tmp"
  done <"$sums"
  want=$(awk -v n="$name" '$2 == n {print $1}' "$sums")
  got=$(sha256sum "$out/$name.tmp" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "error: joined $name has sha256 $got, manifest $want: parts are from different downloads; rerun scripts/dali_wheel.sh" >&2
    rm -f "$out/$name.tmp"; return 5
  fi
  mv "$out/$name.tmp" "$out/$name"
  echo "$out/$name"
}

if [ "${1:-}" = join ]; then
  join_wheel "${2:?dali_wheel.sh join OUTDIR}"
  exit $?
fi
if [ "${1:-}" = split ]; then
  [ -f "${2:-}" ] || { echo "error: dali_wheel.sh split FILE: no such file '${2:-}'" >&2; exit 2; }
  split_wheel "$2"
  exit 0
fi
[ -n "$VERSION" ] || { echo "error: no nvidia-dali-cuda130==X pin in pyproject.toml; set DALI_VERSION" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels"
# DALI is one py3-none wheel for every CPython 3; the others are built for the host's 3.12 (glibc x86_64).
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/wheels" "nvidia-dali-cuda130==$VERSION" "${DEPS[@]}"
tar -cf "$tmp/dali-bundle-$VERSION.tar" -C "$tmp/wheels" .
tar -tf "$tmp/dali-bundle-$VERSION.tar" | sed 's/^/  /'
split_wheel "$tmp/dali-bundle-$VERSION.tar"
ls -la "$DEST"
