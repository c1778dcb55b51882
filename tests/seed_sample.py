# The Python sample of Microsoft's article "Creating generalized images without a
# provisioning agent" (MicrosoftDocs/azure-docs, articles/virtual-machines/linux/no-agent.md;
# the copy read here is the zh-TW translation in /work/shared/seed/000_383ee9d11e6d7960.txt,
# ms.date 09/01/2020, author danielsollondon). Docs content (c) Microsoft, CC BY 4.0.
#
# Kept as in the article (f-strings, hard-coded incarnation '1', no retries, no timeout) so
# tests/bench.py can time it side by side with azure_provisioning.py. The ONLY change: the
# WireServer address comes from argv[1] (IP or IP:PORT), default 168.63.129.16.
# Point it only at an emulator on 127.0.0.1 with incarnation=1 (tests/fake_azure.py).
import http.client
import sys
from xml.etree import ElementTree

# Only change from the article: the WireServer address is a parameter
# (argv[1], IP or IP:PORT; http.client parses the port itself).
wireserver_ip = sys.argv[1] if len(sys.argv) > 1 else '168.63.129.16'
wireserver_conn = http.client.HTTPConnection(wireserver_ip)

print('Retrieving goal state from the Wireserver')
wireserver_conn.request(
    'GET',
    '/machine?comp=goalstate',
    headers={'x-ms-version': '2012-11-30'}
)

resp = wireserver_conn.getresponse()

if resp.status != 200:
    print('Unable to connect with wireserver')
    sys.exit(1)

wireserver_goalstate = resp.read().decode('utf-8')

xml_el = ElementTree.fromstring(wireserver_goalstate)

container_id = xml_el.findtext('Container/ContainerId')
instance_id = xml_el.findtext('Container/RoleInstanceList/RoleInstance/InstanceId')
print(f'ContainerId: {container_id}')
print(f'InstanceId: {instance_id}')

# Construct the XML response we need to send to Wireserver to report ready.
health = ElementTree.Element('Health')
goalstate_incarnation = ElementTree.SubElement(health, 'GoalStateIncarnation')
goalstate_incarnation.text = '1'
container = ElementTree.SubElement(health, 'Container')
container_id_el = ElementTree.SubElement(container, 'ContainerId')
container_id_el.text = container_id
role_instance_list = ElementTree.SubElement(container, 'RoleInstanceList')
role = ElementTree.SubElement(role_instance_list, 'Role')
instance_id_el = ElementTree.SubElement(role, 'InstanceId')
instance_id_el.text = instance_id
health_second = ElementTree.SubElement(role, 'Health')
state = ElementTree.SubElement(health_second, 'State')
state.text = 'Ready'

out_xml = ElementTree.tostring(
    health,
    encoding='unicode',
    method='xml'
)
print('Sending the following data to Wireserver:')
print(out_xml)

wireserver_conn.request(
    'POST',
    '/machine?comp=health',
    headers={
        'x-ms-version': '2012-11-30',
        'Content-Type': 'text/xml;charset=utf-8',
        'x-ms-agent-name': 'custom-provisioning'
    },
    body=out_xml
)

resp = wireserver_conn.getresponse()
print(f'Response: {resp.status} {resp.reason}')

wireserver_conn.close()
