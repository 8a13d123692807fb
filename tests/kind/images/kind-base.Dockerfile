# kind's base image rebuilt on a debootstrapped Debian: kind's own files (entrypoint, systemd units,
# containerd config) plus Debian's systemd, containerd, runc and CNI plugins. Built by kind.sh.
ARG BASE=local/debian:bookworm
FROM ${BASE}
COPY files/ /tmp/files/
RUN set -e; cd /tmp/files; install -m 0755 usr/local/bin/* /usr/local/bin/; install -m 0755 crictl /usr/local/bin/; \
    mkdir -p /kind/bin /etc/containerd /etc/default /etc/sysctl.d /etc/systemd/system/kubelet.service.d /etc/cni/net.d; \
    cp -r kind/* /kind/; chmod 0755 /kind /kind/bin /kind/bin/*; \
    install -m 0644 etc/crictl.yaml /etc/; install -m 0644 etc/containerd/* /etc/containerd/; \
    install -m 0644 etc/default/* /etc/default/; install -m 0644 etc/sysctl.d/* /etc/sysctl.d/; \
    install -m 0644 etc/systemd/system/*.service etc/systemd/system/*.slice /etc/systemd/system/; \
    install -m 0644 etc/systemd/system/kubelet.service.d/* /etc/systemd/system/kubelet.service.d/; rm -rf /tmp/files
RUN echo 'Dpkg::Options { "--force-confdef"; "--force-confold"; };' > /etc/apt/apt.conf.d/90confold \
    && DEBIAN_FRONTEND=noninteractive clean-install systemd conntrack iptables nftables iproute2 ethtool util-linux \
       mount kmod libseccomp2 pigz e2fsprogs bash ca-certificates curl jq procps containerd runc containernetworking-plugins \
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
    && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
       /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
       /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf && ln -sf /usr/lib/systemd/systemd /sbin/init \
    && for b in containerd ctr containerd-shim-runc-v2; do ln -sf /usr/bin/$b /usr/local/bin/$b; done \
    && mkdir -p /opt/cni/bin && for p in /usr/lib/cni/*; do ln -sf $p /opt/cni/bin/; done
RUN ctr oci spec | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
      | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \
    && systemctl enable kubelet.service containerd.service undo-mount-hacks.service && systemctl mask systemd-binfmt.service \
    && mkdir -p /etc/kubernetes/manifests
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
