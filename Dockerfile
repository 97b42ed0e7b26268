# The dp processor and CLI, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dp ./dp
COPY consumers ./consumers
RUN pip install --no-cache-dir .
ENTRYPOINT []
CMD ["dp", "serve"]
