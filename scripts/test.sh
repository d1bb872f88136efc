#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -m abuse   # extra arguments go to pytest
# System packages (real peers and clients the tests talk to) are installed
# with apt-get when running as root or with passwordless sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(swaks curl fetchmail mpop msmtp dnsmasq-base postfix openssl opendkim
              dovecot-core dovecot-pop3d)
# Mail::SRS, the SRS reference (tests/interop/test_srs_reference.py); as a
# capability: "perl -MMail::SRS -e1|libmail-srs-perl".
APT_PACKAGES+=(libmail-srs-perl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  # postfix's package asks questions; answer "no configuration", we only use its tools
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections || true
  # The tests start their own Postfix and Dovecot on free loopback ports: keep
  # the packages' system services (ports 25, 110, 143, ...) from starting.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$policy" ] || $SUDO rm -f "$policy"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test,fast]'
exec "$PYTHON" -m pytest "$@"
