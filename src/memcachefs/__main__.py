from memcachefs.cli import main

raise SystemExit(main())
