"""fledge: builds reproducible initramfs images from a fledge.toml."""
