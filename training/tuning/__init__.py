"""``fineserve tune``: Optuna studies over a recipe's ``search:`` section (``search``, ``storage``,
``study``, ``report``; the command in ``__main__``)."""
