#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
#   bash scripts/test.sh                       # the whole suite (a plain `pytest`
#                                              # runs only the unit and integration tiers)
#   bash scripts/test.sh -m abuse              # extra arguments go to pytest
#   bash scripts/test.sh tests/interop/test_postfix.py   # given paths replace tests/
# System packages (real peers and clients the tests talk to) are installed
# with apt-get when running as root or with passwordless sudo.
#
# What is checked is a capability (a program, a Perl module), never only a
# package name: `apt-get install --no-install-recommends swaks` leaves out
# the Perl TLS modules swaks needs for STARTTLS, and an image may have a
# package half-removed.  Each line: the shell test, then the packages that
# provide it.
set -euo pipefail
cd "$(dirname "$0")/.."

CAPABILITIES=(
  "command -v swaks|swaks"
  "perl -MNet::SSLeay -MIO::Socket::SSL -e1|libnet-ssleay-perl libio-socket-ssl-perl"
  "perl -MMail::SRS -e1|libmail-srs-perl"
  "command -v curl|curl"
  "command -v fetchmail|fetchmail"
  "command -v mbsync|isync"
  "command -v offlineimap|offlineimap3"
  "command -v getmail|getmail6"
  "command -v mpop|mpop"
  # tests/interop/test_managesieve.py: a real ManageSieve client.
  "command -v sieve-connect|sieve-connect"
  "command -v msmtp|msmtp"
  "command -v gnutls-cli|gnutls-bin"
  "command -v openssl|openssl"
  # tests/integration/test_tls_profile.py: the protocols and suites offered.
  "command -v sslscan|sslscan"
  "command -v ip|iproute2"
  "test -x /usr/sbin/dnsmasq|dnsmasq-base"
  # tests/integration/test_dane.py: a zone signed with ldns-signzone, validated by unbound.
  "test -x /usr/sbin/unbound|unbound"
  "command -v ldns-keygen && command -v ldns-signzone|ldnsutils"
  "test -x /usr/sbin/postfix && test -x /usr/sbin/smtp-sink && test -x /usr/sbin/smtp-source|postfix"
  "test -x /usr/sbin/opendkim|opendkim"
  # tests/interop/test_milter_*.py: rspamd as a milter (proxy worker) and its
  # controller learning into a redis the test starts.
  "command -v rspamd|rspamd"
  "command -v redis-server|redis-server"
  "test -x /usr/sbin/dovecot|dovecot-core"
  "test -x /usr/lib/dovecot/pop3|dovecot-pop3d"
  "test -x /usr/lib/dovecot/imap|dovecot-imapd"
  "command -v strace|strace"
  # tests/integration/test_metrics.py: promtool lints the scrape, a real
  # Prometheus server scrapes /metrics (both in Debian's prometheus).
  "command -v promtool|prometheus"
  "command -v prometheus|prometheus"
  "command -v systemd-analyze|systemd"
  "command -v useradd|passwd"
  "command -v unshare|util-linux"
  # tests/integration/test_acme.py: pebble, the ACME test CA, issues and renews.
  "command -v pebble|pebble"
  # tests/interop/test_web_browser.py: the web pages in a real browser (Playwright drives it).
  "command -v chromium|chromium"
  # tests/integration/cluster: a real PostgreSQL (initdb, postgres) the tests
  # start in a temporary directory ([cluster] database); setpriv runs it as
  # the postgres user when the tests run as root.
  "ls /usr/lib/postgresql/*/bin/initdb|postgresql"
  "command -v setpriv|util-linux"
)
missing=()
for entry in "${CAPABILITIES[@]}"; do
  check=${entry%%|*}
  if ! bash -c "$check" >/dev/null 2>&1; then
    read -r -a pkgs <<<"${entry#*|}"
    missing+=("${pkgs[@]}")
  fi
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
  for entry in "${CAPABILITIES[@]}"; do  # installed, but still not usable: say so now
    bash -c "${entry%%|*}" >/dev/null 2>&1 || echo "warning: still missing after install: ${entry%%|*}" >&2
  done
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test,fast]'
# pyproject's testpaths are the fast tiers: name tests/ (every tier) unless
# the arguments name test paths themselves.
paths=(tests)
for arg in "$@"; do
  if [[ $arg != -* && -e ${arg%%::*} ]]; then
    paths=()
    break
  fi
done
exec "$PYTHON" -m pytest "${paths[@]}" "$@"
