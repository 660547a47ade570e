"""Joining the list: the public signup's stages (the proof-of-work challenge, the
confirmation links, the decisions on a posted form, the mails it sends and the mailer
that sends them); the pages themselves are :mod:`newsletter.web.signup`."""
