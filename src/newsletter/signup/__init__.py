"""The public signup: the proof-of-work challenge its form carries (:mod:`.challenge`), so
that a bot cannot make us send confirmation mail cheaply; the double opt-in follows."""
