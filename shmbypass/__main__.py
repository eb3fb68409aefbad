from shmbypass.cli import main

raise SystemExit(main())
