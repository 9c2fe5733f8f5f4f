import sys

from datasetdm.cli import main

sys.exit(main())
