# The dp processor and CLI, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY dp ./dp
COPY consumers ./consumers
# Exactly the versions and hashes of uv.lock (runtime only), then dp itself.
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv export --frozen --no-dev --no-emit-project --format requirements-txt -o /tmp/requirements.txt \
 && pip uninstall -y uv \
 && pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps .
ENTRYPOINT []
CMD ["dp", "serve"]
