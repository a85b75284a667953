#!/usr/bin/env bash
# Build stable-diffusion.cpp's CPU command-line program (sd-cli), the benchmark anchor of benchmarks/sdcpp_anchor.py.
#
#   benchmarks/sdcpp/build.sh [SRC_DIR] OUT_DIR
#
# SRC_DIR  a stable-diffusion.cpp source tree with ggml at ./ggml (e.g. `git clone --recursive`), used as it is; or
#          an empty or missing folder, or nothing (then OUT_DIR/src): the sources are extracted there from two git
#          directories (bare clones or mirrors, no work tree needed):
#            SDCPP_GIT_DIR  stable-diffusion.cpp's git dir   (default /work/.mirror/leejet+stable-diffusion.cpp/repo)
#            SDCPP_REV      its revision                     (default HEAD)
#            GGML_GIT_DIR   ggml's git dir                   (default /work/.mirror/ggml-org+ggml/repo)
#            GGML_REV       ggml's revision                  (default: the submodule commit SDCPP_REV records)
#          Blobs the git dirs lack (partial snapshots omit big files) are left out of the extraction; those under
#          src/tokenizers/vocab/ (the embedded vocabularies of other model families: T5, UMT5, Qwen, Mistral, Gemma,
#          GPT-OSS) are replaced by stubs defining their arrays as one NUL byte: an SD 1.x/2.x/XL build needs only
#          clip_merges.hpp, and any other missing file under src/, include/, examples/ or ggml/ is an error.
# OUT_DIR  where the build goes: OUT_DIR/build (the CMake tree), OUT_DIR/bin/sd-cli, OUT_DIR/build-info.txt (this
#          script's log) and OUT_DIR/bin/sdcpp-build.json (the commits, stubs, CMake options and build time, which
#          benchmarks/sdcpp_anchor.py copies into its rows: a build from extracted sources reports "version unknown").
#
# Environment: JOBS (parallel compile jobs, default 2), CMAKE_EXTRA (more cmake arguments, split on spaces).
# The CMake options: -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON (-march=native: the binary fits this CPU only)
# -DSD_WEBP=OFF -DSD_WEBM=OFF (no libwebp/libwebm submodules needed: PNG output only) -DSD_BUILD_SHARED_LIBS=OFF,
# and only the sd-cli target is built (not sd-server, whose web frontend is another submodule).
set -euo pipefail

if [ $# -eq 1 ]; then
    SRC="" OUT="$1"
elif [ $# -eq 2 ]; then
    SRC="$1" OUT="$2"
else
    sed -n '2,/^set -euo/p' "$0" | grep '^#' >&2
    exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ -n "$SRC" ] || SRC="$OUT/src"
JOBS="${JOBS:-2}"
SDCPP_GIT_DIR="${SDCPP_GIT_DIR:-/work/.mirror/leejet+stable-diffusion.cpp/repo}"
GGML_GIT_DIR="${GGML_GIT_DIR:-/work/.mirror/ggml-org+ggml/repo}"
SDCPP_REV="${SDCPP_REV:-HEAD}"
INFO="$OUT/build-info.txt"
: >"$INFO"
say() { echo "sdcpp-build: $*" | tee -a "$INFO"; }

# extract GIT_DIR REV DEST: the files of REV into DEST, one `git cat-file` each (git archive and checkout-index stop
# at the first blob a partial snapshot lacks); the paths of the missing blobs are printed, one a line, on stdout
extract() {
    local git_dir="$1" rev="$2" dest="$3" mode type sha path
    mkdir -p "$dest"
    git --git-dir="$git_dir" ls-tree -r --full-tree "$rev" | while IFS=$'\t' read -r meta path; do
        read -r mode type sha <<<"$meta"
        [ "$type" = blob ] || continue # submodules (commit entries) stay empty folders
        mkdir -p "$dest/$(dirname "$path")"
        if ! git --git-dir="$git_dir" cat-file -e "$sha" 2>/dev/null; then
            echo "$path"
        elif [ "$mode" = 120000 ]; then
            ln -s "$(git --git-dir="$git_dir" cat-file blob "$sha")" "$dest/$path"
        else
            git --git-dir="$git_dir" cat-file blob "$sha" >"$dest/$path"
            [ "$mode" != 100755 ] || chmod +x "$dest/$path"
        fi
    done
}

sd_commit="" ggml_commit="" stubbed=()
if [ -f "$SRC/CMakeLists.txt" ]; then
    say "using the source tree $SRC as it is"
    sd_commit="$(git -C "$SRC" rev-parse HEAD 2>/dev/null || true)"
    ggml_commit="$(git -C "$SRC/ggml" rev-parse HEAD 2>/dev/null || true)"
    [ -f "$SRC/ggml/CMakeLists.txt" ] || { echo "sdcpp-build: $SRC/ggml is empty: clone with --recursive" >&2; exit 1; }
else
    [ -d "$SDCPP_GIT_DIR" ] || { echo "sdcpp-build: no source tree and no SDCPP_GIT_DIR ($SDCPP_GIT_DIR)" >&2; exit 1; }
    [ -d "$GGML_GIT_DIR" ] || { echo "sdcpp-build: no GGML_GIT_DIR ($GGML_GIT_DIR)" >&2; exit 1; }
    sd_commit="$(git --git-dir="$SDCPP_GIT_DIR" rev-parse "$SDCPP_REV^{commit}")"
    ggml_sub="$(git --git-dir="$SDCPP_GIT_DIR" ls-tree "$sd_commit" ggml | awk '{print $3}')"
    GGML_REV="${GGML_REV:-$ggml_sub}"
    ggml_commit="$(git --git-dir="$GGML_GIT_DIR" rev-parse "$GGML_REV^{commit}")"
    say "stable-diffusion.cpp $sd_commit from $SDCPP_GIT_DIR"
    say "ggml $ggml_commit from $GGML_GIT_DIR (the submodule records $ggml_sub)"
    mkdir -p "$SRC"
    [ -z "$(ls -A "$SRC")" ] || { echo "sdcpp-build: $SRC is neither a source tree nor empty" >&2; exit 1; }
    sd_missing="$(extract "$SDCPP_GIT_DIR" "$sd_commit" "$SRC")"
    rm -rf "$SRC/ggml"
    ggml_missing="$(extract "$GGML_GIT_DIR" "$ggml_commit" "$SRC/ggml")"
    [ -z "$ggml_missing" ] || { echo "sdcpp-build: ggml lacks: $ggml_missing" >&2; exit 1; }
    vocab=src/tokenizers/vocab
    while IFS= read -r path; do
        case "$path" in
            "") ;;
            "$vocab"/*.hpp) stubbed+=("$path") ;;
            src/* | include/* | examples/cli/* | examples/common/* | CMakeLists.txt | cmake/* | thirdparty/*.[ch]*)
                echo "sdcpp-build: the snapshot lacks $path, which the build needs" >&2
                exit 1
                ;;
            *) say "left out (absent from the snapshot, unused by the build): $path" ;;
        esac
    done <<<"$sd_missing"
    if [ ${#stubbed[@]} -gt 0 ]; then
        # the arrays vocab.cpp reads (sizeof(NAME)) that the headers present do not define
        names="$(grep -o 'sizeof([a-z0-9_]*)' "$SRC/$vocab/vocab.cpp" | sed 's/sizeof(\(.*\))/\1/' | sort -u)"
        stub="// stub written by ipa_rt's benchmarks/sdcpp/build.sh: the snapshot lacked this vocabulary; an SD-only
// build never reads these arrays (one NUL byte each, so that vocab.cpp's sizeof() still compiles)
#ifndef IPA_RT_SDCPP_VOCAB_STUBS
#define IPA_RT_SDCPP_VOCAB_STUBS"
        for name in $names; do
            if ! grep -qs "\b$name\[\]" "$SRC/$vocab"/*.hpp; then
                stub+=$'\n'"static const unsigned char ${name}[] = {0};"
            fi
        done
        stub+=$'\n'"#endif"
        for path in "${stubbed[@]}"; do
            printf '%s\n' "$stub" >"$SRC/$path"
            say "stubbed (absent from the snapshot): $path"
        done
        say "stub arrays: $(grep -o 'char [a-z0-9_]*' "$SRC/${stubbed[0]}" | cut -d' ' -f2 | tr '\n' ' ')"
    fi
fi

CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF -DSD_BUILD_SHARED_LIBS=OFF)
# shellcheck disable=SC2206
[ -z "${CMAKE_EXTRA:-}" ] || CMAKE_ARGS+=($CMAKE_EXTRA)
say "cmake -S $SRC -B $OUT/build ${CMAKE_ARGS[*]}"
start=$(date +%s)
cmake -S "$SRC" -B "$OUT/build" "${CMAKE_ARGS[@]}" >"$OUT/cmake-configure.log" 2>&1 ||
    { tail -30 "$OUT/cmake-configure.log" >&2; exit 1; }
say "cmake --build $OUT/build --target sd-cli -j $JOBS"
cmake --build "$OUT/build" --target sd-cli -j "$JOBS" >"$OUT/cmake-build.log" 2>&1 ||
    { tail -40 "$OUT/cmake-build.log" >&2; exit 1; }
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/sd-cli" "$OUT/bin/sd-cli"
build_s=$(($(date +%s) - start))
compiler="$(${CXX:-c++} --version | head -1)"
say "built $OUT/bin/sd-cli in $build_s s ($JOBS jobs, $compiler)"
json_list() { local out="" x; for x in "$@"; do out+="${out:+, }\"$x\""; done; printf '[%s]' "$out"; }
cat >"$OUT/bin/sdcpp-build.json" <<JSON
{
  "sdcpp_commit": "$sd_commit",
  "ggml_commit": "$ggml_commit",
  "stubbed": $(json_list "${stubbed[@]}"),
  "cmake_args": $(json_list "${CMAKE_ARGS[@]}"),
  "jobs": $JOBS,
  "build_s": $build_s,
  "compiler": "$compiler"
}
JSON
"$OUT/bin/sd-cli" --version 2>&1 | head -3 | sed 's/^/sdcpp-build: /' | tee -a "$INFO" || true
