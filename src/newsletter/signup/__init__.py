"""Public signup (double opt-in): the confirmation and welcome mails (``mails``)."""
