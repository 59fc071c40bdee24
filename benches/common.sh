# Shared by the benchmark scripts (sourced, not run). Expects FERRY and WORK.

# Generates DATA (SIZE of VALUES values) with `ferry bench` when missing.
ensure_dataset() { # DATA SIZE VALUES
  [ -f "$1/CURRENT" ] && return
  echo "generating the dataset: $2 of $3 values" >&2
  mkdir -p "$(dirname "$1")"
  "$FERRY" bench --prepare-only --workdir "$WORK/gen" --size "$2" --values "$3" >&2
  mv "$WORK/gen/leader" "$1"
}

# Throwaway host and client keys and an sshd_config in $WORK/ssh for an sshd
# on ADDR:PORT; sets SSH to the matching client command.
prepare_sshd() { # ADDR PORT
  mkdir -p "$WORK/ssh" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host" && ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/client"
  cat > "$WORK/ssh/sshd_config" <<CONF
Port $2
ListenAddress $1
HostKey $WORK/ssh/host
AuthorizedKeysFile $WORK/ssh/client.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
CONF
  SSH="ssh -p $2 -i $WORK/ssh/client -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
}
