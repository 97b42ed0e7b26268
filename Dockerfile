# The dp processor and CLI, for docker-compose.yml: exactly the versions and hashes of uv.lock.
FROM python:3.11-slim
WORKDIR /app
# The same uv as scripts/uv; it builds dp with the setuptools pinned in pyproject.toml.
RUN pip install --no-cache-dir uv==0.13.9
COPY pyproject.toml uv.lock README.md ./
COPY dp ./dp
COPY consumers ./consumers
ENV UV_PROJECT_ENVIRONMENT=/opt/dp UV_PYTHON_DOWNLOADS=never PATH=/opt/dp/bin:$PATH
RUN uv sync --frozen --no-dev --no-editable --no-cache
ENTRYPOINT []
CMD ["dp", "serve"]
