from recipes.smollm2.cli import main

raise SystemExit(main())
