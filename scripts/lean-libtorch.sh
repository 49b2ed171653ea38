#!/usr/bin/env bash
# Builds empty stand-ins for the libraries Debian's libtorch_cpu names as
# dependencies but never uses, so that the programs that train do not load them.
#
#   scripts/lean-libtorch.sh LIBTORCH_CPU OUTDIR COMPILER
#
# Debian's libtorch_cpu.so carries DT_NEEDED entries for Caffe2's image, video
# and database operators (OpenCV, FFmpeg, LevelDB, LMDB, ZeroMQ). Together with
# what those pull in (Qt, GDAL, GDCM, poppler, ...) that is ~250 shared
# libraries and ~65 MB of resident pages in every process that links libtorch,
# although libtorch_cpu imports not one symbol from them.
#
# For each such dependency this script checks, against the installed files:
#   - libtorch_cpu imports none of the symbols the library defines, and
#   - none of libtorch_cpu's other dependencies needs it (ldd),
# and only then writes OUTDIR/<soname>: a shared object with that soname and no
# symbols. Executables that find OUTDIR first (DT_RPATH, see CMakeLists.txt)
# load the stand-in instead. If a later libtorch did import a symbol from one,
# the check leaves that library out; and a stand-in that lacked a symbol would
# fail at load time ("undefined symbol"), never silently.
#
# Prints the sonames written, one per line; exits non-zero on any failure.
set -euo pipefail
# /sbin is not on every user's PATH.
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
[ $# -eq 3 ] || { echo "usage: $0 LIBTORCH_CPU OUTDIR COMPILER" >&2; exit 2; }
torch_cpu=$1 outdir=$2 cc=$3
[ -r "$torch_cpu" ] || { echo "$0: cannot read $torch_cpu" >&2; exit 1; }
export LC_ALL=C

family='^lib(opencv_[A-Za-z0-9_]+|avcodec|avformat|avutil|avdevice|avfilter|swscale|swresample|postproc|leveldb|lmdb|zmq)\.so'

resolve() {  # soname -> path, the way the dynamic linker finds it
  "$ldconfig" -p | awk -v n="$1" '$1 == n && !found { print $NF; found = 1 }'
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
readelf -d "$torch_cpu" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' > "$work/needed"
nm -D --undefined-only "$torch_cpu" | awk '{ print $2 }' | sed 's/@.*//' | sort -u > "$work/imports"

# What the dependencies we keep need in turn.
: > "$work/kept_closure"
while read -r so; do
  [[ $so =~ $family ]] && continue
  path=$(resolve "$so")
  if [ -n "$path" ]; then
    ldd "$path" 2>/dev/null | awk '{ print $1 }' >> "$work/kept_closure" || true
  fi
done < "$work/needed"

mkdir -p "$outdir"
rm -f "$outdir"/lib*.so*
printf '' > "$work/empty.c"
while read -r so; do
  [[ $so =~ $family ]] || continue
  path=$(resolve "$so")
  if [ -z "$path" ]; then
    echo "$0: $so not installed; leaving it to the dynamic linker" >&2
    continue
  fi
  used=$(nm -D --defined-only "$path" | awk '{ print $3 }' | sed 's/@.*//' | sort -u |
         comm -12 - "$work/imports" | wc -l)
  if [ "$used" -ne 0 ]; then
    echo "$0: libtorch_cpu imports $used symbols from $so; keeping it" >&2
    continue
  fi
  if grep -qxF "$so" "$work/kept_closure"; then
    echo "$0: another dependency of libtorch_cpu needs $so; keeping it" >&2
    continue
  fi
  "$cc" -x c -shared -nostdlib -Wl,-soname,"$so" -o "$outdir/$so" "$work/empty.c"
  echo "$so"
done < "$work/needed"
