"""The adaptive fusion policy: a blend per site, from an attention over the candidates, trained end to end."""
