"""The command-line tools of w2v-knnvq, installed as the package ``w2v_knnvq_tools`` with one
``w2v-knnvq-*`` command each (see ``[project.scripts]`` in ``pyproject.toml``); in a checkout
``python tools/NAME.py`` runs them in place."""
