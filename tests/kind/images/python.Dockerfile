# Stand-in for the public python:3.11-slim-bookworm image (no registry is reachable here): Debian's
# python3 in a venv that is first on PATH, so `pip install` and `python` behave as in the official
# image. Only the project's local builds use it (--build-arg PYTHON=local/python:3.11-slim-bookworm).
ARG BASE=local/debian:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/python \
 && ln -s /opt/python/bin/python /usr/local/bin/python
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
