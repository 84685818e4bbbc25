# The recorder's image. Build it from the repository root:
#
#     docker build -t ingestor .
#     docker run --init -v ingestor-data:/data -p 127.0.0.1:9108:9108 ingestor
#
# It lives at the root, not in deploy/, because the build context has to be the root
# (pip needs setup.cfg, pyproject.toml and README.md beside the package, and the
# migrations in sql/), and `docker build .` then finds both this file and .dockerignore
# without flags. deploy/docker-compose.yml builds it the same way.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid/gid, so a bind-mounted host directory can be chowned to it ahead of time
# and Kubernetes' runAsNonRoot can check the numeric USER below. Not root: as root, the
# embedded PostgreSQL's wheel would `useradd` a system user of its own at run time.
RUN groupadd --system --gid 10001 ingestor \
    && useradd --system --uid 10001 --gid ingestor --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin ingestor

WORKDIR /opt/ingestor
COPY pyproject.toml setup.cfg README.md ./
COPY ingestor/ ingestor/
# A regular install: the migrations travel as package data (ingestor/db/sql), and
# tests/test_deploy.py checks that a wheel of this tree finds them. pip compiles the
# installed modules, so the running user never needs to write __pycache__.
RUN pip install . && rm -rf /opt/ingestor/ingestor

# Everything the recorder keeps between runs: the disk spool (batches waiting for the
# database) and, without INGESTOR_DSN, the embedded PostgreSQL. The directory is made and
# owned before VOLUME so a new named volume starts with that owner.
RUN mkdir /data && chown ingestor:ingestor /data
VOLUME ["/data"]
# The sources under /opt/ingestor are not the running user's to write; files a command
# writes to the working directory (exports, a .env it reads) belong on the volume.
WORKDIR /data

# Settings as INGESTOR_* variables rather than CMD flags: flags win over the environment,
# so flags here would silently override `docker run -e INGESTOR_SHARDS=...`.
# The ingestor binds /health and /metrics to 127.0.0.1 by default, which nothing outside
# the container can reach; publishing the port is what limits who can.
ENV INGESTOR_DATA_DIR=/data \
    INGESTOR_HTTP_HOST=0.0.0.0 \
    INGESTOR_HTTP_PORT=9108 \
    INGESTOR_SHARDS=4

USER 10001:10001
EXPOSE 9108

# No curl in the slim image. urlopen raises on the 503 that /health answers while a
# worker, a connection or the database is down, so the exit status is the verdict. The
# start period covers migrations and the symbol universe fetched over REST at start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('INGESTOR_HTTP_PORT', '9108'), timeout=4)"]

# SIGTERM makes the supervisor stop the readers, commit (or spool) everything received
# and exit 0; give it time (docker stop --time / compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingestor"]
CMD ["run"]
