# GPU host image: the trainer and the server, CUDA builds of torch and torch-tensorrt, a non-root user.
#   docker build -t dmd2-fast .
#   docker run --gpus all -p 8000:8000 -v /models/my-generator:/models/generator:ro -v dmd2-cache:/cache \
#       dmd2-fast --model /models/generator --backend compile
# /cache keeps compiled artefacts (Inductor's caches, --backend aoti's packages) and TensorRT
# engines, so the second start skips compilation.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    DMD2_CACHE_DIR=/cache \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# g++ and the Python headers: Triton builds its launcher with a C compiler at run time, and
# --backend aoti compiles its packages' C++ wrapper (torch.compile and aoti fail without them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first (the CUDA 12.8 build) with the torch-tensorrt release made for it (its TensorRT
# wheels come from PyPI), so the project install keeps both; torchao for optimizer=adamw8bit.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0" "torch-tensorrt==2.13.0" "torchao==0.18.0"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY dmd2_train ./dmd2_train
COPY dmd2_serve ./dmd2_serve
COPY kernels ./kernels
RUN pip install .

# Ubuntu 24.04's images come with a user 'ubuntu' of uid 1000, and useradd --uid 1000 stopped the build
# ("UID 1000 is not unique"): it goes first.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --create-home --uid 1000 dmd2 && mkdir -p /models /cache && chown 1000 /models /cache
USER 1000
VOLUME ["/models", "/cache"]
EXPOSE 8000

# The start period covers a first start's compile (SDXL: minutes); the first healthy answer ends it.
# A --port other than 8000 needs docker run --health-cmd with that port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

# With no arguments the bundled digits generator is served; pass --model DIR for another.
ENTRYPOINT ["python", "-m", "dmd2_serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
