"""Allocation: the interface (`base`), the shared budget rules (`budget`), `uniform` and global (`ranked`)."""
