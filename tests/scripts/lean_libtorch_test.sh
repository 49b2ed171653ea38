#!/usr/bin/env bash
# scripts/lean-libtorch.sh against stand-in "libtorch_cpu" libraries built here:
# a dependency the library calls into must be kept, one it only names gets an
# empty stand-in with its soname, and bad arguments fail.
#
#   tests/scripts/lean_libtorch_test.sh SOURCE_DIR C_COMPILER
set -euo pipefail
# /sbin is not on every user's PATH.
ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
src=$1 cc=$2
script=$src/scripts/lean-libtorch.sh
zmq=$("$ldconfig" -p | awk '$1 == "libzmq.so.5" && !f { print $NF; f = 1 }')
[ -n "$zmq" ] || { echo "FAIL: libzmq.so.5 (a libtorch dependency) is not installed"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fails=0
check() {  # description, command...
  local what=$1; shift
  if "$@"; then echo "ok: $what"; else echo "FAIL: $what"; fails=$((fails + 1)); fi
}

# Names libzmq and calls zmq_version from it.
cat > "$work/uses.c" <<'C'
void zmq_version(int*, int*, int*);
int torch_like(void) { int a, b, c; zmq_version(&a, &b, &c); return a; }
C
"$cc" -shared -fPIC -o "$work/libuses.so" "$work/uses.c" -Wl,--no-as-needed "$zmq"
# Names libzmq but calls nothing in it (what Debian's libtorch_cpu does).
echo 'int torch_like(void) { return 1; }' > "$work/names.c"
"$cc" -shared -fPIC -o "$work/libnames.so" "$work/names.c" -Wl,--no-as-needed "$zmq"

check "the test libraries name libzmq.so.5" \
  bash -c "readelf -d '$work/libuses.so' | grep -q 'NEEDED.*libzmq.so.5' &&
           readelf -d '$work/libnames.so' | grep -q 'NEEDED.*libzmq.so.5'"

out=$("$script" "$work/libuses.so" "$work/lean-uses" "$cc" 2> "$work/err-uses")
check "a library that is called is kept" test -z "$out"
check "and the script says why" grep -q "imports .* symbols from libzmq.so.5; keeping it" "$work/err-uses"
check "no stand-in is written for it" test ! -e "$work/lean-uses/libzmq.so.5"

out=$("$script" "$work/libnames.so" "$work/lean-names" "$cc")
check "a library that is only named gets a stand-in" test "$out" = "libzmq.so.5"
check "the stand-in carries its soname" \
  bash -c "readelf -d '$work/lean-names/libzmq.so.5' | grep -q 'SONAME.*\[libzmq.so.5\]'"
check "the stand-in defines no symbols" \
  bash -c "! nm -D --defined-only '$work/lean-names/libzmq.so.5' 2>/dev/null | grep -q ' [TDBR] '"
# A program linked against libnames.so with the stand-in directory first loads
# the stand-in and runs.
echo 'int torch_like(void); int main(void) { return torch_like() == 1 ? 0 : 1; }' > "$work/main.c"
"$cc" -o "$work/prog" "$work/main.c" "$work/libnames.so" \
  -Wl,--disable-new-dtags,-rpath,"$work/lean-names:$work"
check "a program runs on the stand-in" "$work/prog"
check "and loads it rather than the real one" \
  bash -c "ldd '$work/prog' | grep -q 'libzmq.so.5 => $work/lean-names/libzmq.so.5'"

# A rerun replaces what an earlier run wrote.
touch "$work/lean-names/libstale.so.1"
"$script" "$work/libnames.so" "$work/lean-names" "$cc" > /dev/null
check "a rerun clears stale stand-ins" test ! -e "$work/lean-names/libstale.so.1"

check "a missing library is an error" \
  bash -c "! '$script' '$work/nonexistent.so' '$work/x' '$cc' 2> '$work/err-missing'"
check "naming the file" grep -q "cannot read $work/nonexistent.so" "$work/err-missing"
check "wrong arguments exit 2" bash -c "'$script' > /dev/null 2> '$work/err-usage'; test \$? -eq 2"
check "and print the usage" grep -q "usage: .* LIBTORCH_CPU OUTDIR COMPILER" "$work/err-usage"

[ "$fails" -eq 0 ] || { echo "$fails check(s) failed"; exit 1; }
