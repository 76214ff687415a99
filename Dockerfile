# syntax=docker/dockerfile:1
# Build stage: a wheel and its dependencies, compiled where needed, kept out of the runtime image.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/rwatch \
 && /opt/rwatch/bin/pip install --no-compile . \
 && /opt/rwatch/bin/python -m compileall -q /opt/rwatch/lib

# Runtime stage: slim Python, the virtualenv, a fixed non-root user, state on a volume.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="rwatch" \
      org.opencontainers.image.description="Follow BlueKing CMDB's resource_watch stream without losing an event"
RUN groupadd --system --gid 10001 rwatch \
 && useradd --system --uid 10001 --gid rwatch --home-dir /var/lib/rwatch --shell /usr/sbin/nologin rwatch \
 && install -d -o rwatch -g rwatch -m 0750 /var/lib/rwatch \
 && install -d -m 0755 /etc/rwatch
COPY --from=build /opt/rwatch /opt/rwatch
COPY config.toml /etc/rwatch/config.toml
ENV PATH="/opt/rwatch/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    RWATCH_CONFIG=/etc/rwatch/config.toml \
    RWATCH_STORE__URL=sqlite:////var/lib/rwatch/state.db \
    RWATCH_HTTP__LISTEN=0.0.0.0:9108
WORKDIR /var/lib/rwatch
VOLUME ["/var/lib/rwatch"]
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["rwatch", "health"]
ENTRYPOINT ["rwatch"]
CMD ["run"]
