# Gateway image: the embedding & reranker gateway only (the vLLM servers run from the official
# vllm/vllm-openai image, see docker-compose.yml).
#
#   docker build -t erproxy .
#   docker run -p 2048:2048 -v erproxy-data:/data \
#       -e EMBEDDING_UPSTREAMS=http://embedding-host:8000 -e RERANKER_UPSTREAMS=http://reranker-host:8001 erproxy
#
# The key file and the logs live in the /data volume; the first start writes the new API key once to
# /data/er_api_keys.json.new-key (never to docker logs: read it, then delete it).
# More keys: docker exec CONTAINER python embedding_reranker_proxy.py keys create --name NAME
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# Unprivileged user; the code stays root-owned (read-only for the app), /data is the app's.
RUN groupadd --system --gid 10001 erproxy \
 && useradd --system --uid 10001 --gid erproxy --home-dir /app --no-create-home --shell /usr/sbin/nologin erproxy \
 && mkdir -p /data/logs \
 && chown -R erproxy:erproxy /data

COPY embedding_reranker_proxy.py .env.example ./
COPY erproxy/ ./erproxy/
RUN python -m compileall -q erproxy embedding_reranker_proxy.py

ENV HOST=0.0.0.0 \
    PORT=2048 \
    API_KEYS_FILE=/data/er_api_keys.json \
    LOG_DIR=/data/logs

VOLUME ["/data"]
USER 10001:10001
EXPOSE 2048

# Healthy while GET /health answers 200 (503 means a model kind has no reachable vLLM replica).
# Plain urllib, so the image needs no curl; HTTPS when SSL_CERTFILE is set (self-signed allowed).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, ssl, urllib.request; scheme = 'https' if os.environ.get('SSL_CERTFILE') else 'http'; urllib.request.urlopen(scheme + '://127.0.0.1:' + os.environ.get('PORT', '2048') + '/health', timeout=4, context=ssl._create_unverified_context())"

CMD ["python", "embedding_reranker_proxy.py"]
