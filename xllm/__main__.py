from xllm.main import main

raise SystemExit(main())
