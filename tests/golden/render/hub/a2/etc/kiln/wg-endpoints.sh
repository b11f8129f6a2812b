#!/bin/sh
# Rendered by kiln from hub.toml (cluster lab). Do not edit: change the profile and rebuild.
# Set WireGuard endpoints given by DNS name; exit 1 (retried) until all resolve.
status=0
wg set wg0 peer isrq/SbeYHnrzovA4I0E8Mw4HUja9ed+mOobNCtNy08= endpoint lab.example.org:51830 || { echo "kiln-wg-endpoints: lab.example.org:51830 does not resolve yet"; status=1; }
exit $status
