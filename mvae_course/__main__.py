from mvae_course.cli import main

raise SystemExit(main())
