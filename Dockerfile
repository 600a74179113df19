# irnn on a CPU PyTorch, with JupyterLab and the pipeline notebook.
#
#   docker build -t irnn .
#   docker run --rm -p 8888:8888 irnn                           # JupyterLab: open the printed 127.0.0.1 link
#   mkdir -p runs && chmod a+w runs   # the container runs as uid 1000
#   docker run --rm -v "$PWD/runs:/home/irnn/work/runs" irnn irnn train --steps 2000
#   docker build --build-arg EXTRAS=notebook,tensorboard,wandb -t irnn .   # with the trackers
#
# This image is checked statically (hadolint and tests/test_docker.py); it is not built in CI.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++ builds the fused CPU engine (a small C++ extension compiled on first use); without it irnn
# falls back to the plain PyTorch engine.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash irnn

# The CPU build of PyTorch first, from PyTorch's CPU index, so that no multi-GB CUDA build is pulled.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/irnn
COPY pyproject.toml README.md ./
COPY src ./src
ARG EXTRAS=notebook
# The package itself (its dependencies are ranges in pyproject.toml; torch is already satisfied).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

# Run as a plain user; runs and notebook outputs go to /home/irnn/work (mount a volume there to keep them).
USER 1000:1000
WORKDIR /home/irnn/work
ENV IRNN_NOTEBOOK_OUT=/home/irnn/work/runs/notebook
COPY --chown=1000:1000 notebooks ./notebooks

EXPOSE 8888
# Any other command replaces this one: `docker run --rm irnn irnn train ...`.
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "notebooks/pipeline.ipynb"]
