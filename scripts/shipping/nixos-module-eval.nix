# Evaluates flake.nix's NixOS module without nixpkgs, against a stand-in of the few `lib`, `pkgs` and
# `config` attributes it uses, to check its wiring: settings and drop-ins become files under
# /etc/chatcli, credentials become LoadCredential=, config changes reload instead of restarting, and
# the unit keeps the hardening of systemd/chatcli.service. What the real nixpkgs does with these
# (pkgs.formats.toml, the systemd unit generator) is not exercised here.
let
  flake = import ../../flake.nix;
  outputs = flake.outputs { self = outputs // { packages.x86_64-linux.default = "/nix/store/stub-chatcli"; }; nixpkgs = throw "nixpkgs is not available here"; };
  lib = {
    mkOption = o: o;
    mkEnableOption = d: { type = "bool"; default = false; description = d; };
    literalExpression = t: t;
    mkIf = cond: value: if cond then value else { };
    types = { package = "package"; bool = "bool"; str = "str"; path = "path"; listOf = t: "list of ${t}"; attrsOf = t: "attrs of ${t}"; };
    mapAttrs = builtins.mapAttrs;
    mapAttrs' = f: set: builtins.listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
    nameValuePair = name: value: { inherit name value; };
    mapAttrsToList = f: set: map (n: f n set.${n}) (builtins.attrNames set);
    attrValues = set: map (n: set.${n}) (builtins.attrNames set);
    escapeShellArgs = args: builtins.concatStringsSep " " (map (a: "'${a}'") args);
    getExe = p: "${p}/bin/chatcli";
    optional = cond: x: if cond then [ x ] else [ ];
  };
  pkgs = {
    formats.toml = { }: { type = "toml"; generate = name: value: "/nix/store/stub-${name}"; };
    coreutils = "/nix/store/stub-coreutils";
    stdenv.hostPlatform.system = "x86_64-linux";
  };
  config.services.chatcli = {
    enable = true;
    package = "/nix/store/stub-chatcli";
    settings = { metrics.port = 9464; llm.default = "openai"; };
    dropIns."50-anthropic" = { };
    credentials = { openai = "/run/keys/openai"; token = "/run/keys/token"; };
    extraArgs = [ "--log-format" "json" ];
    openFirewall = true;
  };
  module = outputs.nixosModules.default { inherit config lib pkgs; };
  unit = module.config.systemd.services.chatcli;
in
{
  options = builtins.attrNames module.options.services.chatcli;
  etc = builtins.attrNames module.config.environment.etc;
  execStart = unit.serviceConfig.ExecStart;
  execReload = unit.serviceConfig.ExecReload;
  loadCredential = unit.serviceConfig.LoadCredential;
  reloadTriggers = unit.reloadTriggers;
  environment = unit.environment;
  firewall = module.config.networking.firewall.allowedTCPPorts;
  # Every key of the shared systemd settings reaches the unit unchanged.
  keepsServiceConfig = builtins.all (k: unit.serviceConfig.${k} == outputs.lib.systemdService.serviceConfig.${k})
    (builtins.attrNames outputs.lib.systemdService.serviceConfig);
}
