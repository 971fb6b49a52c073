import sys

from mirage.app.main import main

sys.exit(main())
