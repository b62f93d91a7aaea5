from sae_mc import main

raise SystemExit(main())
