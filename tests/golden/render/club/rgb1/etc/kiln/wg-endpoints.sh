#!/bin/sh
# Rendered by kiln from club.toml (cluster club). Do not edit: change the profile and rebuild.
# Set WireGuard endpoints given by DNS name; exit 1 (retried) until all resolve.
status=0
wg set wg0 peer in8aLqpdujLG8XAFqR8Hys5zP2Uu4hNoUkomX1oX1X4= endpoint hub.example.org:51820 || { echo "kiln-wg-endpoints: hub.example.org:51820 does not resolve yet"; status=1; }
exit $status
