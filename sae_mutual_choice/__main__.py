from sae_mutual_choice.cli import main

raise SystemExit(main())
