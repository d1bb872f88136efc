from postoffice.cli import main

raise SystemExit(main())
