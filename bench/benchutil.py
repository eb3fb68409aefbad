"""Helpers shared by the bench/ suites."""
import os

from shmbypass import manager


# One definition, in the manager: this process inside the bypass group.
InGroup = manager.InGroup
