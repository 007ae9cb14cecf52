"""The Vagrant lab: real VMs (vagrant-libvirt, QEMU) on a private network, driven from the host.

* :mod:`lab.vagrant.box` builds (and caches, like the QEMU lab image) a Debian bookworm box for
  vagrant-libvirt with everything the provisioning and the tests need baked in, so the VMs need
  no package mirror and no network beyond the lab's own;
* :mod:`lab.vagrant.host` installs vagrant-libvirt on the host, starts libvirtd by hand (the
  host may have no systemd) and stops it again by pid, and runs ``vagrant`` against the
  project's own ``vagrant/Vagrantfile``.

``python3 -m lab.vagrant --help`` is the command-line face.
"""

from __future__ import annotations
