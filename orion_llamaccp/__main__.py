from orion_llamaccp.cli import main

raise SystemExit(main())
