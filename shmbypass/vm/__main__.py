"""python -m shmbypass.vm build|launch|status|format|bench"""
import sys

from shmbypass.vm.cli import main

sys.exit(main())
