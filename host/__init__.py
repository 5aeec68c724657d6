"""volar: the host side. Installs plugins, launches VMs, listens to kestrel."""
