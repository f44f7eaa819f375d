import sys

from exocli.main import main

sys.exit(main())
