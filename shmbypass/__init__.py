"""shmbypass: transparent shared-memory TCP bypass for co-located programs."""
__version__ = "0.1.0"
