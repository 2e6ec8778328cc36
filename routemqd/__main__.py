from routemqd.cli import main

raise SystemExit(main())
